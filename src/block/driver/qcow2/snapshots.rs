//! Internal snapshots taken and deleted while the image is open.
//!
//! Both run as one task on the control thread while every user of the
//! node is drained, with the same helpers the I/O threads use.
//!
//! Taking one: the active L1 table is copied to new clusters; the new
//! refcounts (one more for every L2 table and data cluster the active image
//! reaches) are computed in memory; the COPIED flags of the active L1 and
//! L2 entries are cleared on disk (then in memory) and flushed; the
//! refcount blocks are written, flushed; the new snapshot table goes
//! to new clusters, flushed; then the header names it (the snapshot count
//! and table offset in one sector write), flushed; only then does the old
//! table's space count one reference less.
//!
//! Deleting one: the new table and the header first, as above; then the
//! snapshot's L1 table, its L2 tables and their data clusters count one
//! reference less, and so do the old table's clusters (the ones no longer
//! counted at all are discarded in the file with `pass-discard-snapshot`);
//! then the active entries whose cluster is counted once again get their
//! COPIED flag back.
//!
//! A crash before the header write leaves the image as it was, with
//! leaked clusters; after it, the new state with leaked clusters. A crash
//! between the flag writes and the refcount block writes (taking: while
//! the tables and blocks are written; deleting: while the active tables
//! are walked for COPIED) leaves flags that `qemu-img check` reports as
//! not matching the counts: harmless (a cluster without the flag is copied
//! before it is written), and `qemu-img check -r all` fixes it.

use super::alloc::{
    adjust_refcounts, flush_file, meta_buf, read_file, stage_refcounts, take_run, write_file,
    write_refcount_blocks,
};
use super::guard;
use super::io::Qcow2Io;
use crate::block::qcow2::format::{
    encode_snapshot_table, L1Entry, L2Entry, Snapshot, COPIED, MAX_TABLE_LEN,
};
use crate::qapi::SnapshotInfo;
use std::sync::atomic::Ordering;

/// Refcount changes gathered before they are applied (bounds the memory a
/// walk over a large image takes).
const BATCH: usize = 1 << 16;

/// Header offsets of the snapshot count and the table's offset.
const NB_SNAPSHOTS_AT: usize = 60;
const SNAPSHOTS_OFFSET_AT: usize = 64;

/// The snapshot table as the image has it now.
#[derive(Default)]
pub struct SnapTable {
    pub list: Vec<Snapshot>,
    /// Where the table is in the file (0 when there is none).
    pub offset: u64,
    /// Its length in bytes, as written.
    pub len: u64,
}

/// What a snapshot looks like in QMP answers.
pub fn info(sn: &Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: String::from_utf8_lossy(&sn.id).into_owned(),
        name: String::from_utf8_lossy(&sn.name).into_owned(),
        vm_state_size: i64::try_from(sn.vm_state_size()).unwrap_or(i64::MAX),
        date_sec: i64::from(sn.date_sec),
        date_nsec: i64::from(sn.date_nsec),
        vm_clock_sec: (sn.vm_clock_nsec / 1_000_000_000) as i64,
        vm_clock_nsec: (sn.vm_clock_nsec % 1_000_000_000) as i64,
    }
}

/// Whether `sn` is the one asked for: by id, by name, or by both.
pub fn matches(sn: &Snapshot, id: Option<&str>, name: Option<&str>) -> bool {
    id.is_none_or(|i| sn.id == i.as_bytes())
        && name.is_none_or(|n| sn.name == n.as_bytes())
        && (id.is_some() || name.is_some())
}

/// The id QEMU gives a new snapshot: one more than the largest numeric id.
pub fn next_id(list: &[Snapshot]) -> Vec<u8> {
    let max = list
        .iter()
        .map(|sn| {
            std::str::from_utf8(&sn.id)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    (max + 1).to_string().into_bytes()
}

/// The clusters a data entry of an L2 table holds (none for an
/// unallocated or plain zero entry; a compressed one may span two).
fn data_clusters(io: &Qcow2Io, raw: u64) -> Result<Vec<u64>, i32> {
    let cs = io.geo.cluster_size();
    match L2Entry::decode(raw, &io.geo) {
        Ok(L2Entry::Normal { host_offset, .. })
        | Ok(L2Entry::Zero {
            host_offset: Some(host_offset),
            ..
        }) => Ok(vec![host_offset]),
        Ok(L2Entry::Compressed(c)) => {
            let first = c.host_offset / cs * cs;
            let last = (c.host_offset + c.compressed_len() - 1) / cs * cs;
            Ok((0..=(last - first) / cs).map(|i| first + i * cs).collect())
        }
        Ok(_) => Ok(Vec::new()),
        Err(e) => Err(io.corrupt(&format!("L2 entry {raw:#x}: {e}"))),
    }
}

/// Reads the L2 table at `offset` from the file (not the cache).
async fn read_table(io: &Qcow2Io, offset: u64) -> Result<Vec<u64>, i32> {
    let mut buf = meta_buf(io, io.geo.cluster_size() as usize)?;
    read_file(io, offset, &mut buf).await?;
    Ok(super::words::be_words(buf.as_slice()).collect())
}

/// Writes `words` as a table of whole clusters at `offset`.
async fn write_table(io: &Qcow2Io, offset: u64, words: &[u64]) -> Result<(), i32> {
    let cs = io.geo.cluster_size();
    let len = ((words.len() as u64 * 8).div_ceil(cs)).max(1) * cs;
    let mut buf = meta_buf(io, len as usize)?;
    buf.as_mut_slice().fill(0);
    super::words::put_table_words(buf.as_mut_slice(), offset, offset, |i| {
        words.get(i).copied().unwrap_or(0)
    });
    write_file(io, offset, &mut buf).await
}

/// The active L1 table's first `l1_size` entries.
fn active_l1(io: &Qcow2Io) -> Vec<u64> {
    let n = io.l1_size.load(Ordering::Acquire) as usize;
    io.l1
        .iter()
        .take(n)
        .map(|w| w.load(Ordering::Acquire))
        .collect()
}

/// Rewrites the active L1 table's entries on disk (the units they fall
/// in, keeping the bytes around them), then in memory.
async fn store_active_l1(io: &Qcow2Io, words: &[u64]) -> Result<(), i32> {
    let Some(a) = io.alloc.as_ref() else {
        return Err(-libc::EROFS);
    };
    if words.is_empty() {
        return Ok(());
    }
    let table = io.l1_table_offset;
    let start = table / a.unit * a.unit;
    let end = (table + words.len() as u64 * 8).div_ceil(a.unit) * a.unit;
    let mut buf = meta_buf(io, (end - start) as usize)?;
    read_file(io, start, &mut buf).await?;
    let bytes = buf.as_mut_slice();
    for (i, w) in words.iter().enumerate() {
        let at = (table - start) as usize + i * 8;
        bytes[at..at + 8].copy_from_slice(&w.to_be_bytes());
    }
    write_file(io, start, &mut buf).await?;
    flush_file(io).await?;
    for (slot, &w) in io.l1.iter().zip(words) {
        slot.store(w, Ordering::Release);
    }
    Ok(())
}

/// Changes the active L2 table at `offset` on disk, then in the cache if
/// it is there.
async fn store_active_l2(io: &Qcow2Io, offset: u64, words: &[u64]) -> Result<(), i32> {
    write_table(io, offset, words).await?;
    if let Some(t) = io.cache().table(offset) {
        for (slot, &w) in t.iter().zip(words) {
            slot.store(w, Ordering::Release);
        }
    }
    Ok(())
}

/// Writes a new snapshot table for `list` and switches the header to it;
/// the old table's clusters are the caller's to release.
async fn switch_table(io: &Qcow2Io, list: &[Snapshot]) -> Result<(u64, u64), i32> {
    let Some(a) = io.alloc.as_ref() else {
        return Err(-libc::EROFS);
    };
    let cs = io.geo.cluster_size();
    let bytes = encode_snapshot_table(list).map_err(|e| io.corrupt(&e.to_string()))?;
    if bytes.len() > MAX_TABLE_LEN {
        return Err(-libc::EFBIG);
    }
    let offset = if list.is_empty() {
        0
    } else {
        let clusters = (bytes.len() as u64).div_ceil(cs).max(1);
        let at = take_run(io, a, clusters).await?;
        let mut buf = meta_buf(io, (clusters * cs) as usize)?;
        buf.as_mut_slice().fill(0);
        buf.as_mut_slice()[..bytes.len()].copy_from_slice(&bytes);
        write_file(io, at, &mut buf).await?;
        flush_file(io).await?;
        at
    };
    let mut head = meta_buf(io, a.unit as usize)?;
    read_file(io, 0, &mut head).await?;
    let h = head.as_mut_slice();
    h[NB_SNAPSHOTS_AT..NB_SNAPSHOTS_AT + 4].copy_from_slice(&(list.len() as u32).to_be_bytes());
    h[SNAPSHOTS_OFFSET_AT..SNAPSHOTS_OFFSET_AT + 8].copy_from_slice(&offset.to_be_bytes());
    write_file(io, 0, &mut head).await?;
    flush_file(io).await?;
    Ok((offset, bytes.len() as u64))
}

/// The clusters of `len` bytes from `offset`.
fn clusters_of(io: &Qcow2Io, offset: u64, len: u64) -> Vec<u64> {
    let cs = io.geo.cluster_size();
    if offset == 0 || len == 0 {
        return Vec::new();
    }
    (0..len.div_ceil(cs)).map(|i| offset + i * cs).collect()
}

/// Takes the snapshot `sn` (id, name and dates set) of the active image.
pub async fn create(io: &Qcow2Io, mut sn: Snapshot) -> Result<(), i32> {
    let Some(a) = io.alloc.as_ref() else {
        return Err(-libc::EROFS);
    };
    let cs = io.geo.cluster_size();
    flush_file(io).await?;
    let l1 = active_l1(io);
    // The snapshot's own L1 table: the active one, without COPIED flags.
    let copy: Vec<u64> = l1.iter().map(|w| w & !COPIED).collect();
    let l1_at = if copy.is_empty() {
        0
    } else {
        let at = take_run(io, a, (copy.len() as u64 * 8).div_ceil(cs)).await?;
        write_table(io, at, &copy).await?;
        at
    };
    // Every table and data cluster the active image reaches gets one more
    // reference: computed first, in memory, and written last, after the
    // active entries lost COPIED (on disk and in memory). Between those
    // writes, and only there, the flags do not match the counts.
    let mut more: Vec<(u64, i64)> = Vec::new();
    let mut dirty: Vec<u64> = Vec::new();
    for &raw in &l1 {
        let e = L1Entry::decode(raw, &io.geo).map_err(|e| io.corrupt(&format!("L1: {e}")))?;
        if e.l2_offset == 0 {
            continue;
        }
        more.push((e.l2_offset, 1));
        for w in read_table(io, e.l2_offset).await? {
            more.extend(data_clusters(io, w)?.into_iter().map(|c| (c, 1)));
        }
        if more.len() >= BATCH {
            stage_refcounts(io, a, &more, &mut dirty).await?;
            more.clear();
        }
    }
    stage_refcounts(io, a, &more, &mut dirty).await?;
    for &raw in &l1 {
        let e = L1Entry::decode(raw, &io.geo).map_err(|e| io.corrupt(&format!("L1: {e}")))?;
        if e.l2_offset == 0 {
            continue;
        }
        let words = read_table(io, e.l2_offset).await?;
        let cleared: Vec<u64> = words
            .iter()
            .map(|&w| match L2Entry::decode(w, &io.geo) {
                Ok(L2Entry::Normal { .. })
                | Ok(L2Entry::Zero {
                    host_offset: Some(_),
                    ..
                }) => w & !COPIED,
                _ => w,
            })
            .collect();
        if cleared != words {
            store_active_l2(io, e.l2_offset, &cleared).await?;
        }
    }
    flush_file(io).await?;
    store_active_l1(io, &copy).await?;
    io.meta_writes.fetch_add(1, Ordering::AcqRel);
    write_refcount_blocks(io, a, &dirty).await?;
    flush_file(io).await?;
    sn.l1_table_offset = l1_at;
    sn.l1_size = copy.len() as u32;
    sn.disk_size = Some(io.size.load(Ordering::Acquire));
    let (mut list, old_at, old_len) = {
        let t = io.snapshots();
        (t.list.clone(), t.offset, t.len)
    };
    list.push(sn);
    let (at, len) = switch_table(io, &list).await?;
    {
        let mut t = io.snapshots();
        *t = SnapTable {
            list,
            offset: at,
            len,
        };
    }
    // The overlap checks learn the new structures: the table, the
    // snapshot's L1, and its L2 tables (the active ones, now shared).
    io.guard.register(at, len, guard::SNAPSHOT_TABLE);
    io.guard
        .register(l1_at, copy.len() as u64 * 8, guard::INACTIVE_L1);
    for &raw in &copy {
        if let Ok(e) = L1Entry::decode(raw, &io.geo) {
            if e.l2_offset != 0 {
                io.guard.register(e.l2_offset, cs, guard::INACTIVE_L2);
            }
        }
    }
    let old: Vec<(u64, i64)> = clusters_of(io, old_at, old_len)
        .into_iter()
        .map(|c| (c, -1))
        .collect();
    if !old.is_empty() {
        let counts = adjust_refcounts(io, a, &old).await?;
        flush_file(io).await?;
        forget_freed(io, zeroes(&counts));
    }
    Ok(())
}

/// Deletes the snapshot at `index` of the table; what it was.
pub async fn delete(io: &Qcow2Io, index: usize, pass_discard: bool) -> Result<Snapshot, i32> {
    let Some(a) = io.alloc.as_ref() else {
        return Err(-libc::EROFS);
    };
    let cs = io.geo.cluster_size();
    flush_file(io).await?;
    let (mut list, old_at, old_len) = {
        let t = io.snapshots();
        (t.list.clone(), t.offset, t.len)
    };
    if index >= list.len() {
        return Err(-libc::ENOENT);
    }
    let sn = list.remove(index);
    let (at, len) = switch_table(io, &list).await?;
    {
        let mut t = io.snapshots();
        *t = SnapTable {
            list,
            offset: at,
            len,
        };
    }
    // Nothing on disk names the snapshot any more: its references go.
    let mut less: Vec<(u64, i64)> = Vec::new();
    let mut freed: Vec<u64> = Vec::new();
    if sn.l1_size > 0 {
        let bytes = u64::from(sn.l1_size) * 8;
        let mut buf = meta_buf(io, (bytes.div_ceil(cs) * cs) as usize)?;
        read_file(io, sn.l1_table_offset, &mut buf).await?;
        let l1: Vec<u64> = super::words::be_words(buf.as_slice())
            .take(sn.l1_size as usize)
            .collect();
        for raw in l1 {
            let e = L1Entry::decode(raw, &io.geo)
                .map_err(|e| io.corrupt(&format!("snapshot L1: {e}")))?;
            if e.l2_offset == 0 {
                continue;
            }
            less.push((e.l2_offset, -1));
            for w in read_table(io, e.l2_offset).await? {
                less.extend(data_clusters(io, w)?.into_iter().map(|c| (c, -1)));
            }
            if less.len() >= BATCH {
                freed.extend(zeroes(&adjust_refcounts(io, a, &less).await?));
                less.clear();
            }
        }
        less.extend(
            clusters_of(io, sn.l1_table_offset, bytes)
                .into_iter()
                .map(|c| (c, -1)),
        );
    }
    less.extend(
        clusters_of(io, old_at, old_len)
            .into_iter()
            .map(|c| (c, -1)),
    );
    freed.extend(zeroes(&adjust_refcounts(io, a, &less).await?));
    flush_file(io).await?;
    io.guard.register(at, len, guard::SNAPSHOT_TABLE);
    forget_freed(io, freed.iter().copied());
    if pass_discard {
        freed.sort_unstable();
        freed.dedup();
        for host in freed {
            discard_in_file(io, host).await;
        }
    }
    restore_copied(io).await?;
    Ok(sn)
}

/// Clusters nothing counts any more hold no structure the overlap checks
/// should keep guarding (they may hold data next).
fn forget_freed(io: &Qcow2Io, freed: impl Iterator<Item = u64>) {
    let cs = io.geo.cluster_size();
    for host in freed {
        io.guard.forget(host, cs, u16::MAX);
    }
}

/// The clusters among `counts` that nothing counts any more.
fn zeroes(counts: &[(u64, u64)]) -> impl Iterator<Item = u64> + '_ {
    counts.iter().filter(|&&(_, c)| c == 0).map(|&(h, _)| h)
}

/// Discards a cluster nothing counts any more in the file (best effort).
async fn discard_in_file(io: &Qcow2Io, host: u64) {
    use crate::block::io::{IoKind, IoRequest};
    let cs = io.geo.cluster_size();
    let r = crate::io::task::submit(
        io.file.get(),
        &IoRequest::without_data(IoKind::Discard, host, cs, 0),
    )
    .await;
    if r < 0 {
        log::debug!("qcow2 node '{}': discarding {host}: {r}", io.name);
    }
}

/// Sets COPIED again on the active entries whose cluster is counted once.
async fn restore_copied(io: &Qcow2Io) -> Result<(), i32> {
    let Some(a) = io.alloc.as_ref() else {
        return Err(-libc::EROFS);
    };
    let l1 = active_l1(io);
    let mut new_l1 = l1.clone();
    for (i, &raw) in l1.iter().enumerate() {
        let e = L1Entry::decode(raw, &io.geo).map_err(|e| io.corrupt(&format!("L1: {e}")))?;
        if e.l2_offset == 0 {
            continue;
        }
        let table_count = count_of(io, a, e.l2_offset).await?;
        if table_count == 1 {
            new_l1[i] = raw | COPIED;
        } else {
            // Still shared: its entries stay as they are.
            continue;
        }
        let words = read_table(io, e.l2_offset).await?;
        let mut hosts = Vec::new();
        for &w in &words {
            match L2Entry::decode(w, &io.geo) {
                Ok(L2Entry::Normal { host_offset, .. })
                | Ok(L2Entry::Zero {
                    host_offset: Some(host_offset),
                    ..
                }) => hosts.push((host_offset, 0)),
                _ => {}
            }
        }
        let counts = adjust_refcounts(io, a, &hosts).await?;
        let mut next = words.clone();
        let mut changed = false;
        let mut k = 0;
        for (w, out) in words.iter().zip(next.iter_mut()) {
            let data = matches!(
                L2Entry::decode(*w, &io.geo),
                Ok(L2Entry::Normal { .. })
                    | Ok(L2Entry::Zero {
                        host_offset: Some(_),
                        ..
                    })
            );
            if !data {
                continue;
            }
            let once = counts.get(k).is_some_and(|&(_, c)| c == 1);
            k += 1;
            if once && w & COPIED == 0 {
                *out = w | COPIED;
                changed = true;
            }
        }
        if changed {
            store_active_l2(io, e.l2_offset, &next).await?;
        }
    }
    flush_file(io).await?;
    if new_l1 != l1 {
        store_active_l1(io, &new_l1).await?;
    }
    io.meta_writes.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// The refcount of one cluster.
async fn count_of(io: &Qcow2Io, a: &super::alloc::Allocator, host: u64) -> Result<u64, i32> {
    Ok(adjust_refcounts(io, a, &[(host, 0)])
        .await?
        .first()
        .map_or(0, |&(_, c)| c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(id: &str, name: &str) -> Snapshot {
        Snapshot::new(id.as_bytes().to_vec(), name.as_bytes().to_vec())
    }

    #[test]
    fn a_new_snapshot_gets_one_more_than_the_largest_numeric_id() {
        assert_eq!(next_id(&[]), b"1");
        let list = [sn("2", "a"), sn("x", "b"), sn("10", "c")];
        assert_eq!(next_id(&list), b"11");
    }

    #[test]
    fn a_snapshot_is_found_by_id_by_name_or_by_both() {
        let s = sn("3", "night");
        assert!(matches(&s, Some("3"), None));
        assert!(matches(&s, None, Some("night")));
        assert!(matches(&s, Some("3"), Some("night")));
        assert!(!matches(&s, Some("3"), Some("day")));
        assert!(!matches(&s, None, None));
    }
}
