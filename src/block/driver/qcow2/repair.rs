//! Repairing the refcounts of a dirty image (lazy refcounts, not closed
//! cleanly) before it is opened for writing, as QEMU does at open: every
//! cluster the image references is counted by walking its metadata (the
//! header, the refcount structures, the active L1 table, the snapshot
//! table and each snapshot's L1 table, and through every L1 table its L2
//! tables and the clusters they map), the refcount blocks are rewritten
//! where they disagree, the file is flushed, and only then is the dirty
//! bit cleared.
//!
//! The repair works in place: counts in a range the refcount table has no
//! block for get a new block at the end of the file (written and flushed
//! before the table entry). A table too short for the file, or a count
//! wider than the refcount width, fails the open and leaves the image as
//! it was (QEMU would rebuild the refcount structures elsewhere in the
//! file; `qemu-img check -r all` does). Images with persistent bitmaps
//! are not repaired yet.

use crate::block::drain::Root;
use crate::block::error::BlockError;
use crate::block::qcow2::format::{
    get_refcount, incompatible, set_refcount, Geometry, Header, L2Entry, Snapshot, OFFSET_MASK,
    REFTABLE_OFFSET_MASK,
};
use crate::block::sync_io;

/// The most clusters a repair counts (512 MiB of counts in memory).
const MAX_CLUSTERS: u64 = 1 << 27;

/// The byte of the header's incompatible features holding the dirty bit.
const DIRTY_BYTE: usize = 79;

fn failed(why: impl std::fmt::Display) -> BlockError {
    BlockError::invalid(format!("Could not repair dirty image: {why}"))
}

/// The reference counts the image's metadata implies, per host cluster.
struct Counts {
    cluster_bits: u32,
    counts: Vec<u32>,
}

impl Counts {
    /// Counts one more reference to each cluster of `[off, off + len)`.
    fn add(&mut self, off: u64, len: u64) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        for c in first..=last {
            let slot = self
                .counts
                .get_mut(c as usize)
                .ok_or_else(|| failed(format!("offset {off:#x} is past the end of the file")))?;
            *slot = slot.saturating_add(1);
        }
        Ok(())
    }
}

/// Repairs a dirty image's refcounts and clears its dirty bit, on disk
/// and in `header`.
pub fn repair_dirty(file: &Root, header: &mut Header, geo: &Geometry) -> Result<(), BlockError> {
    if header.bitmaps().is_some() {
        return Err(failed(
            "images with persistent bitmaps are not repaired by vubd yet",
        ));
    }
    let cs = geo.cluster_size();
    let file_len = file.length()?;
    let clusters = file_len.div_ceil(cs);
    if clusters > MAX_CLUSTERS {
        return Err(failed("the image is too large to be repaired by vubd"));
    }
    let mut counts = Counts {
        cluster_bits: cs.trailing_zeros(),
        counts: vec![0; clusters as usize],
    };
    counts.add(0, cs)?;
    let reftable_bytes = u64::from(header.refcount_table_clusters) * cs;
    counts.add(header.refcount_table_offset, reftable_bytes)?;
    let reftable = read_words(file, header.refcount_table_offset, reftable_bytes)?;
    for &e in &reftable {
        let block = e & REFTABLE_OFFSET_MASK;
        if block != 0 {
            counts.add(block, cs)?;
        }
    }
    count_l1(
        file,
        geo,
        &mut counts,
        header.l1_table_offset,
        header.l1_size,
    )?;
    if header.nb_snapshots > 0 {
        let table = super::read_snapshots(file, header, false)
            .map_err(|_| failed("the snapshot table cannot be read"))?;
        let snapshots = &table.list;
        if snapshots.len() != header.nb_snapshots as usize {
            return Err(failed("the snapshot table cannot be read"));
        }
        counts.add(header.snapshots_offset, table.len)?;
        for Snapshot {
            l1_table_offset,
            l1_size,
            ..
        } in snapshots
        {
            count_l1(file, geo, &mut counts, *l1_table_offset, *l1_size)?;
        }
    }
    let fixed = write_counts(file, header, geo, &reftable, &mut counts)?;
    // The counts are stable before the header stops saying they may not be.
    file.flush()?;
    clear_dirty(file, header)?;
    log::warn!("repaired the refcounts of a dirty qcow2 image ({fixed} refcount blocks rewritten)");
    Ok(())
}

fn read_words(file: &Root, offset: u64, bytes: u64) -> Result<Vec<u64>, BlockError> {
    if bytes > 32 << 20 {
        return Err(failed("a table is too large"));
    }
    let mut raw = vec![0u8; bytes as usize];
    sync_io::read_at(&**file, offset, &mut raw)?;
    Ok(super::words::be_words(&raw).collect())
}

/// Counts an L1 table, its L2 tables and the clusters they map.
fn count_l1(
    file: &Root,
    geo: &Geometry,
    counts: &mut Counts,
    offset: u64,
    entries: u32,
) -> Result<(), BlockError> {
    let cs = geo.cluster_size();
    let bytes = u64::from(entries) * 8;
    counts.add(offset, bytes)?;
    for e in read_words(file, offset, bytes)? {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        counts.add(l2, cs)?;
        for raw in read_words(file, l2, cs)? {
            match L2Entry::decode(raw, geo).map_err(failed)? {
                L2Entry::Normal { host_offset, .. }
                | L2Entry::Zero {
                    host_offset: Some(host_offset),
                    ..
                } => counts.add(host_offset, cs)?,
                L2Entry::Compressed(c) => counts.add(c.host_offset, c.compressed_len())?,
                L2Entry::Zero { .. } | L2Entry::Unallocated => {}
            }
        }
    }
    Ok(())
}

/// Places a new refcount block at the end of the file for every range
/// that has counts but no block (each new block counting itself); the
/// table entries that changed.
fn add_missing_blocks(
    geo: &Geometry,
    reftable: &mut [u64],
    counts: &mut Counts,
) -> Result<Vec<usize>, BlockError> {
    let cs = geo.cluster_size();
    let per_block = geo.refcount_block_entries() as usize;
    let mut added = Vec::new();
    loop {
        let missing = counts
            .counts
            .chunks(per_block)
            .enumerate()
            .find(|(t, chunk)| {
                reftable
                    .get(*t)
                    .is_none_or(|e| e & REFTABLE_OFFSET_MASK == 0)
                    && chunk.iter().any(|&n| n != 0)
            })
            .map(|(t, _)| t);
        let Some(t) = missing else {
            return Ok(added);
        };
        let Some(slot) = reftable.get_mut(t) else {
            return Err(failed("the refcount table would have to grow"));
        };
        *slot = counts.counts.len() as u64 * cs;
        counts.counts.push(1);
        added.push(t);
    }
}

/// Rewrites the refcount blocks that disagree with `counts` (adding the
/// missing ones, then the table entries that point at them); how many.
fn write_counts(
    file: &Root,
    header: &Header,
    geo: &Geometry,
    reftable: &[u64],
    counts: &mut Counts,
) -> Result<usize, BlockError> {
    let mut reftable = reftable.to_vec();
    let added = add_missing_blocks(geo, &mut reftable, counts)?;
    let reftable = &reftable;
    let cs = geo.cluster_size();
    let per_block = geo.refcount_block_entries();
    let order = header.refcount_order;
    let max = if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    };
    let blocks = (counts.counts.len() as u64).div_ceil(per_block);
    let mut fixed = 0;
    for t in 0..blocks.max(reftable.len() as u64) {
        let from = (t * per_block) as usize;
        let wanted = counts.counts.get(from..).unwrap_or(&[]);
        let wanted = &wanted[..wanted.len().min(per_block as usize)];
        let block = reftable
            .get(t as usize)
            .map_or(0, |e| e & REFTABLE_OFFSET_MASK);
        if block == 0 {
            if wanted.iter().any(|&n| n != 0) {
                return Err(failed(format!(
                    "clusters from {:#x} have no refcount block",
                    (from as u64) * cs
                )));
            }
            continue;
        }
        let mut buf = vec![0u8; cs as usize];
        sync_io::read_at(&**file, block, &mut buf)?;
        let mut changed = false;
        for i in 0..per_block {
            let want = u64::from(wanted.get(i as usize).copied().unwrap_or(0));
            if want > max {
                return Err(failed("a refcount exceeds the image's refcount width"));
            }
            if get_refcount(&buf, order, i).map_err(failed)? != want {
                set_refcount(&mut buf, order, i, want).map_err(failed)?;
                changed = true;
            }
        }
        if changed {
            sync_io::write_at(&**file, block, &buf)?;
            fixed += 1;
        }
    }
    if !added.is_empty() {
        // The new blocks are stable before the table points at them.
        file.flush()?;
        let mut raw = vec![0u8; reftable.len() * 8];
        for (chunk, e) in raw.chunks_exact_mut(8).zip(reftable) {
            chunk.copy_from_slice(&e.to_be_bytes());
        }
        sync_io::write_at(&**file, header.refcount_table_offset, &raw)?;
    }
    Ok(fixed)
}

/// Clears the dirty bit in the file's header, and in `header`.
fn clear_dirty(file: &Root, header: &mut Header) -> Result<(), BlockError> {
    let mut first = vec![0u8; file.mem_alignment().max(512)];
    sync_io::read_at(&**file, 0, &mut first)?;
    first[DIRTY_BYTE] &= !(incompatible::DIRTY as u8);
    sync_io::write_at(&**file, 0, &first)?;
    file.flush()?;
    header.incompatible_features &= !incompatible::DIRTY;
    Ok(())
}
