//! Growing a qcow2 image (block_resize), on the control thread.
//!
//! The L1 table grows within the clusters it already has: the new entries
//! are written as zeroes first, then the header's size and L1 length in
//! one 512-byte write, then a flush. Growing past the table's clusters
//! (beyond 4 TiB with 64 KiB clusters from a small image) and shrinking
//! are not done yet.

use super::io::Qcow2Io;
use super::words::put_table_words;
use crate::block::error::BlockError;
use crate::block::sync_io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Header offsets of the virtual size and the L1 table's length.
const SIZE_AT: usize = 24;
const L1_SIZE_AT: usize = 36;

pub fn grow(io: &Qcow2Io, size: u64) -> Result<(), BlockError> {
    let Some(a) = io.alloc.as_ref() else {
        return Err(BlockError::ReadOnly);
    };
    if size % 512 != 0 {
        return Err(BlockError::invalid(
            "The new size must be a multiple of 512",
        ));
    }
    let current = io.size.load(Ordering::Acquire);
    if size < current {
        return Err(BlockError::invalid(
            "qcow2 images cannot be shrunk by vubd yet",
        ));
    }
    if size == current {
        return Ok(());
    }
    let need = io.geo.l1_entries_for(size);
    if need > io.l1.len() as u64 || need > u64::from(u32::MAX) {
        return Err(BlockError::invalid(
            "Growing a qcow2 image past what its L1 table's clusters map is not supported by vubd yet",
        ));
    }
    let file = io.file.get();
    let old = io.l1_size.load(Ordering::Acquire);
    if need > old {
        // The units of the table that the new entries fall in, rewritten
        // from memory (the new entries are zero there) while no I/O
        // thread rewrites them.
        let unit = a.unit;
        let first = (io.l1_table_offset + old * 8) / unit * unit;
        let end = (io.l1_table_offset + need * 8).div_ceil(unit) * unit;
        let mut at = first;
        while at < end {
            let _held = hold(&a.meta_locks, at, at + unit)?;
            let mut buf = vec![0u8; unit as usize];
            put_table_words(&mut buf, at, io.l1_table_offset, |i| {
                io.l1.get(i).map_or(0, |w| w.load(Ordering::Acquire))
            });
            if at < io.l1_table_offset {
                // The unit begins before the table: keep those bytes.
                let keep = (io.l1_table_offset - at) as usize;
                let mut old_bytes = vec![0u8; keep];
                sync_io::read_at(file, at, &mut old_bytes)?;
                buf[..keep].copy_from_slice(&old_bytes);
            }
            sync_io::write_at(file, at, &buf)?;
            at += unit;
        }
    }
    let mut head = vec![0u8; a.unit as usize];
    sync_io::read_at(file, 0, &mut head)?;
    head[SIZE_AT..SIZE_AT + 8].copy_from_slice(&size.to_be_bytes());
    head[L1_SIZE_AT..L1_SIZE_AT + 4].copy_from_slice(&(need.max(old) as u32).to_be_bytes());
    sync_io::write_at(file, 0, &head)?;
    file.flush()?;
    io.l1_size.store(need.max(old), Ordering::Release);
    io.size.store(size, Ordering::Release);
    log::info!("qcow2 node '{}' grown to {size} bytes", io.name);
    Ok(())
}

/// Takes a metadata range from the control thread, waiting (briefly) for
/// an I/O thread that holds it.
fn hold(
    locks: &crate::io::task::locks::RangeLocks,
    start: u64,
    end: u64,
) -> Result<crate::io::task::locks::RangeGuard, BlockError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(g) = locks.try_lock(start, end) {
            return Ok(g);
        }
        if Instant::now() > deadline {
            return Err(BlockError::invalid("the image's metadata stayed busy"));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
