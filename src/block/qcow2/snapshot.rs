//! The snapshot table: variable-length entries, each 8-byte aligned,
//! parsed with the bytes needed to write them back unchanged.

use super::bytes::{align8, be16, be32, be64, slice};
use super::error::FormatError;

/// Fixed part of an entry, before the extra data, ID and name.
const FIXED_LEN: usize = 40;
/// QEMU refuses more extra data than this in one entry.
pub const MAX_EXTRA_DATA: usize = 1024;
/// QEMU refuses snapshot tables longer than this (1 KiB for each of at
/// most 65536 snapshots).
pub const MAX_TABLE_LEN: usize = 1024 * 65536;
const WHAT: &str = "snapshot table";

/// One snapshot table entry.
///
/// The extra data's known fields are read as far as the entry has them:
/// `vm_state_size_large` (bytes 40-47 of the entry), `disk_size` (48-55),
/// `icount` (56-63). What the extra data holds beyond those (or a partial
/// field) is kept in `unknown_extra`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// The unique ID (not zero terminated).
    pub id: Vec<u8>,
    pub name: Vec<u8>,
    /// When the snapshot was taken: seconds since the epoch and the
    /// nanoseconds after.
    pub date_sec: u32,
    pub date_nsec: u32,
    /// How long the guest had run, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The 32-bit VM state size field (ignored when the 64-bit one is
    /// present).
    pub vm_state_size_32: u32,
    pub vm_state_size_large: Option<u64>,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: Option<u64>,
    /// The record/replay instruction count; `u64::MAX` (-1) when icount
    /// was not in use.
    pub icount: Option<u64>,
    pub unknown_extra: Vec<u8>,
    /// Bytes between this entry and the next one's 8-byte boundary, when
    /// they are not all zero.
    padding: Vec<u8>,
}

impl Snapshot {
    /// A snapshot with the given ID and name, everything else zero, and
    /// the extra data QEMU writes today (all three known fields, icount
    /// marked unused). Set the other fields before encoding.
    pub fn new(id: Vec<u8>, name: Vec<u8>) -> Self {
        Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            id,
            name,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size_32: 0,
            vm_state_size_large: Some(0),
            disk_size: Some(0),
            icount: Some(u64::MAX),
            unknown_extra: Vec::new(),
            padding: Vec::new(),
        }
    }

    /// Sets the VM state size in both fields; the 32-bit one reads 0
    /// when the size does not fit, so that older readers see no state
    /// rather than a cut one.
    pub fn set_vm_state_size(&mut self, size: u64) {
        self.vm_state_size_32 = u32::try_from(size).unwrap_or(0);
        self.vm_state_size_large = Some(size);
    }

    /// Size of the saved VM state in bytes (0: none).
    pub fn vm_state_size(&self) -> u64 {
        self.vm_state_size_large
            .unwrap_or(u64::from(self.vm_state_size_32))
    }

    /// Length of the extra data: the known fields present, then the rest.
    fn extra_len(&self) -> usize {
        [self.vm_state_size_large, self.disk_size, self.icount]
            .iter()
            .take_while(|f| f.is_some())
            .count()
            * 8
            + self.unknown_extra.len()
    }

    /// Length of the entry without its trailing padding.
    fn len(&self) -> usize {
        FIXED_LEN + self.extra_len() + self.id.len() + self.name.len()
    }
}

/// Parses `count` entries from `table`, which starts at the header's
/// `snapshots_offset`. A table shorter than its entries fails with
/// [`FormatError::Truncated`], whose `needed` is the length to read.
pub fn parse_snapshot_table(table: &[u8], count: u32) -> Result<Vec<Snapshot>, FormatError> {
    let mut snapshots: Vec<Snapshot> = Vec::new();
    let mut offset = 0usize;
    for i in 0..count {
        let start = align8(offset);
        if let Some(prev) = snapshots.last_mut() {
            // Zero padding is what the encoder writes anyway; only
            // other bytes need keeping.
            let padding = slice(table, offset, start - offset, WHAT)?;
            if padding.iter().any(|&b| b != 0) {
                prev.padding = padding.to_vec();
            }
        }
        let fixed = slice(table, start, FIXED_LEN, WHAT)?;
        let id_len = usize::from(be16(fixed, 12, WHAT)?);
        let name_len = usize::from(be16(fixed, 14, WHAT)?);
        let extra_len = be32(fixed, 36, WHAT)? as usize;
        if extra_len > MAX_EXTRA_DATA {
            return Err(FormatError::SnapshotExtraTooLarge(i));
        }
        let end = start + FIXED_LEN + extra_len + id_len + name_len;
        if end > MAX_TABLE_LEN {
            return Err(FormatError::SnapshotTableTooBig);
        }
        let mut at = start + FIXED_LEN;
        let extra = slice(table, at, extra_len, WHAT)?;
        at += extra_len;
        let id = slice(table, at, id_len, WHAT)?.to_vec();
        at += id_len;
        let name = slice(table, at, name_len, WHAT)?.to_vec();

        let known = |n: usize| -> Result<Option<u64>, FormatError> {
            if extra.len() >= (n + 1) * 8 {
                be64(extra, n * 8, WHAT).map(Some)
            } else {
                Ok(None)
            }
        };
        let vm_state_size_large = known(0)?;
        let disk_size = known(1)?;
        let icount = known(2)?;
        let used = extra_len.min(24) / 8 * 8;
        snapshots.push(Snapshot {
            l1_table_offset: be64(fixed, 0, WHAT)?,
            l1_size: be32(fixed, 8, WHAT)?,
            id,
            name,
            date_sec: be32(fixed, 16, WHAT)?,
            date_nsec: be32(fixed, 20, WHAT)?,
            vm_clock_nsec: be64(fixed, 24, WHAT)?,
            vm_state_size_32: be32(fixed, 32, WHAT)?,
            vm_state_size_large,
            disk_size,
            icount,
            unknown_extra: extra.get(used..).unwrap_or_default().to_vec(),
            padding: Vec::new(),
        });
        offset = end;
    }
    Ok(snapshots)
}

/// Writes a snapshot table: each entry 8-byte aligned, padded with the
/// bytes it was read with (zeros for new entries), the last one unpadded.
pub fn encode_snapshot_table(snapshots: &[Snapshot]) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    for (index, sn) in snapshots.iter().enumerate() {
        let fail = |reason| Err(FormatError::InconsistentSnapshot { index, reason });
        let (Ok(id_len), Ok(name_len)) = (u16::try_from(sn.id.len()), u16::try_from(sn.name.len()))
        else {
            return fail("the ID or name is longer than 65535 bytes");
        };
        if sn.vm_state_size_large.is_none() && (sn.disk_size.is_some() || sn.icount.is_some())
            || sn.disk_size.is_none() && sn.icount.is_some()
        {
            return fail("an extra data field is present without the ones before it");
        }
        let known = [sn.vm_state_size_large, sn.disk_size, sn.icount]
            .iter()
            .take_while(|f| f.is_some())
            .count();
        if known < 3 && sn.unknown_extra.len() >= 8 {
            return fail("unknown extra data would be read as a known field");
        }
        let extra_len = sn.extra_len();
        if extra_len > MAX_EXTRA_DATA {
            return Err(FormatError::SnapshotExtraTooLarge(
                u32::try_from(index).unwrap_or(u32::MAX),
            ));
        }
        let gap = align8(out.len()) - out.len();
        if index > 0 {
            match snapshots.get(index - 1) {
                Some(prev) if prev.padding.len() == gap => out.extend_from_slice(&prev.padding),
                _ => out.resize(out.len() + gap, 0),
            }
        }
        out.extend_from_slice(&sn.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&sn.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&sn.date_sec.to_be_bytes());
        out.extend_from_slice(&sn.date_nsec.to_be_bytes());
        out.extend_from_slice(&sn.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&sn.vm_state_size_32.to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        for field in [sn.vm_state_size_large, sn.disk_size, sn.icount]
            .into_iter()
            .map_while(|f| f)
        {
            out.extend_from_slice(&field.to_be_bytes());
        }
        out.extend_from_slice(&sn.unknown_extra);
        out.extend_from_slice(&sn.id);
        out.extend_from_slice(&sn.name);
        if out.len() > MAX_TABLE_LEN {
            return Err(FormatError::SnapshotTableTooBig);
        }
    }
    Ok(out)
}

/// Length of the table [`encode_snapshot_table`] writes for `snapshots`.
pub fn snapshot_table_len(snapshots: &[Snapshot]) -> usize {
    snapshots.iter().fold(0, |len, sn| align8(len) + sn.len())
}
