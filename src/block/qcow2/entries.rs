//! L1, L2 and refcount table entries: 64-bit big-endian words (128-bit
//! pairs for extended L2 entries) turned into what they mean and back.
//! Decoding refuses reserved bits and misaligned offsets, so an entry
//! that decodes encodes to the same word.

use super::error::FormatError;
use super::layout::{Geometry, COMPRESSED_SECTOR_SIZE, SUBCLUSTERS_PER_CLUSTER};

/// Bit 63 of L1 and standard L2 entries: the refcount is exactly one, so
/// the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (not extended ones): reads as zeros.
pub const ZERO: u64 = 1;
/// Bits 9-55: a cluster-aligned host offset in L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 9-63: the refcount block offset in refcount table entries.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
/// Bits 1-8 and 56-61 of a standard L2 entry.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// An L1 table entry: where an L2 table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L1Entry {
    /// Offset of the L2 table; 0 if the table (and all it maps) is
    /// unallocated.
    pub l2_offset: u64,
    /// The L2 table's refcount is exactly one.
    pub copied: bool,
}

impl L1Entry {
    pub fn decode(raw: u64, geometry: &Geometry) -> Result<Self, FormatError> {
        if raw & L1_RESERVED != 0 {
            return Err(FormatError::L1ReservedBits(raw));
        }
        let l2_offset = raw & OFFSET_MASK;
        if geometry.offset_in_cluster(l2_offset) != 0 {
            return Err(FormatError::TableEntryUnaligned(l2_offset));
        }
        Ok(L1Entry {
            l2_offset,
            copied: raw & COPIED != 0,
        })
    }

    pub fn encode(&self, geometry: &Geometry) -> Result<u64, FormatError> {
        if geometry.offset_in_cluster(self.l2_offset) != 0 {
            return Err(FormatError::TableEntryUnaligned(self.l2_offset));
        }
        if self.l2_offset & !OFFSET_MASK != 0 {
            return Err(FormatError::OffsetOutOfRange(self.l2_offset));
        }
        Ok(self.l2_offset | if self.copied { COPIED } else { 0 })
    }
}

/// A refcount table entry: the offset of a refcount block, 0 if that
/// block is not allocated (all its refcounts are 0).
pub fn decode_refcount_table_entry(raw: u64, geometry: &Geometry) -> Result<u64, FormatError> {
    if raw & !REFTABLE_OFFSET_MASK != 0 {
        return Err(FormatError::RefcountTableReservedBits(raw));
    }
    if geometry.offset_in_cluster(raw) != 0 {
        return Err(FormatError::TableEntryUnaligned(raw));
    }
    Ok(raw)
}

/// The refcount table entry for a refcount block at `offset`.
pub fn encode_refcount_table_entry(offset: u64, geometry: &Geometry) -> Result<u64, FormatError> {
    if geometry.offset_in_cluster(offset) != 0 {
        return Err(FormatError::TableEntryUnaligned(offset));
    }
    Ok(offset)
}

/// Where a compressed cluster's data is: a byte offset (not aligned) and
/// the number of 512-byte sectors it runs into after the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedCluster {
    pub host_offset: u64,
    pub additional_sectors: u64,
}

impl CompressedCluster {
    /// The descriptor for `compressed_len` (at least 1) bytes of
    /// compressed data at `host_offset`.
    pub fn new(host_offset: u64, compressed_len: u64) -> Self {
        let last = host_offset.saturating_add(compressed_len.max(1) - 1);
        CompressedCluster {
            host_offset,
            additional_sectors: last / COMPRESSED_SECTOR_SIZE
                - host_offset / COMPRESSED_SECTOR_SIZE,
        }
    }

    /// Bytes to read at `host_offset`: to the end of the last sector.
    /// The compressed stream may end before that.
    pub fn compressed_len(&self) -> u64 {
        (self.additional_sectors + 1) * COMPRESSED_SECTOR_SIZE
            - self.host_offset % COMPRESSED_SECTOR_SIZE
    }
}

/// What a (standard) L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: reads come from the backing file, or are zeros.
    Unallocated,
    /// Reads as zeros. `host_offset` is a preallocated cluster, if any.
    /// Never found in images with extended L2 entries, which say this in
    /// their subcluster bitmap.
    Zero {
        host_offset: Option<u64>,
        copied: bool,
    },
    /// Data at `host_offset` (in the external data file, for images that
    /// have one, where offset 0 is valid).
    Normal { host_offset: u64, copied: bool },
    /// Compressed data.
    Compressed(CompressedCluster),
}

impl L2Entry {
    /// Decodes a standard L2 entry (or the first word of an extended one,
    /// when `geometry` says the image has them).
    pub fn decode(raw: u64, geometry: &Geometry) -> Result<Self, FormatError> {
        if raw & COMPRESSED != 0 {
            return decode_compressed(raw, geometry);
        }
        if raw & L2_RESERVED != 0 || (geometry.extended_l2() && raw & ZERO != 0) {
            return Err(FormatError::L2ReservedBits(raw));
        }
        let offset = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if geometry.offset_in_cluster(offset) != 0 {
            return Err(FormatError::ClusterOffsetUnaligned(offset));
        }
        // Offset 0 is a real cluster only in an external data file, where
        // every allocated cluster has the COPIED flag.
        let allocated = offset != 0 || (copied && geometry.external_data_file());
        if !allocated && copied {
            return Err(FormatError::CopiedWithoutOffset(raw));
        }
        Ok(match (raw & ZERO != 0, allocated) {
            (true, false) => L2Entry::Zero {
                host_offset: None,
                copied: false,
            },
            (true, true) => L2Entry::Zero {
                host_offset: Some(offset),
                copied,
            },
            (false, false) => L2Entry::Unallocated,
            (false, true) => L2Entry::Normal {
                host_offset: offset,
                copied,
            },
        })
    }

    /// The word for this entry. Fails for what [`L2Entry::decode`] would
    /// refuse: misaligned or too large offsets, offset 0 where it is not
    /// a cluster, zero flags in images with extended L2 entries.
    pub fn encode(&self, geometry: &Geometry) -> Result<u64, FormatError> {
        let copied_bit = |copied: bool| if copied { COPIED } else { 0 };
        match *self {
            L2Entry::Unallocated => Ok(0),
            L2Entry::Zero { .. } if geometry.extended_l2() => {
                Err(FormatError::L2ReservedBits(ZERO))
            }
            L2Entry::Zero {
                host_offset: None,
                copied,
            } => {
                if copied {
                    return Err(FormatError::CopiedWithoutOffset(ZERO | COPIED));
                }
                Ok(ZERO)
            }
            L2Entry::Zero {
                host_offset: Some(offset),
                copied,
            } => Ok(check_data_offset(offset, copied, geometry)? | ZERO | copied_bit(copied)),
            L2Entry::Normal {
                host_offset,
                copied,
            } => Ok(check_data_offset(host_offset, copied, geometry)? | copied_bit(copied)),
            L2Entry::Compressed(c) => encode_compressed(&c, geometry),
        }
    }
}

/// Checks that a data cluster offset can be stored in an entry that
/// decodes back to it.
fn check_data_offset(offset: u64, copied: bool, geometry: &Geometry) -> Result<u64, FormatError> {
    if geometry.offset_in_cluster(offset) != 0 {
        return Err(FormatError::ClusterOffsetUnaligned(offset));
    }
    if offset & !OFFSET_MASK != 0 || (offset == 0 && !(copied && geometry.external_data_file())) {
        return Err(FormatError::OffsetOutOfRange(offset));
    }
    Ok(offset)
}

/// Host offset bits of a compressed descriptor: the low
/// `62 - (cluster_bits - 8)` bits, of which only bits 0-55 may be used.
fn compressed_offset_mask(geometry: &Geometry) -> u64 {
    ((1u64 << geometry.compressed_offset_bits()) - 1) & ((1u64 << 56) - 1)
}

fn decode_compressed(raw: u64, geometry: &Geometry) -> Result<L2Entry, FormatError> {
    if raw & COPIED != 0 {
        return Err(FormatError::CompressedCopied(raw));
    }
    let x = geometry.compressed_offset_bits();
    let offset_field = raw & ((1u64 << x) - 1);
    if offset_field & !compressed_offset_mask(geometry) != 0 {
        return Err(FormatError::L2ReservedBits(raw));
    }
    let sector_mask = (1u64 << (geometry.cluster_bits() - 8)) - 1;
    Ok(L2Entry::Compressed(CompressedCluster {
        host_offset: offset_field,
        additional_sectors: (raw >> x) & sector_mask,
    }))
}

fn encode_compressed(c: &CompressedCluster, geometry: &Geometry) -> Result<u64, FormatError> {
    if c.host_offset & !compressed_offset_mask(geometry) != 0 {
        return Err(FormatError::OffsetOutOfRange(c.host_offset));
    }
    let sector_mask = (1u64 << (geometry.cluster_bits() - 8)) - 1;
    if c.additional_sectors > sector_mask {
        return Err(FormatError::CompressedTooLong {
            sectors: c.additional_sectors.saturating_add(1),
            cluster_bits: geometry.cluster_bits(),
        });
    }
    Ok(COMPRESSED | (c.additional_sectors << geometry.compressed_offset_bits()) | c.host_offset)
}

/// The second word of an extended L2 entry: per subcluster, whether it is
/// allocated and whether it reads as zeros (bit `i` is subcluster `i`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubclusterBitmap {
    pub allocated: u32,
    pub zero: u32,
}

impl SubclusterBitmap {
    pub fn from_raw(raw: u64) -> Self {
        SubclusterBitmap {
            allocated: raw as u32,
            zero: (raw >> 32) as u32,
        }
    }

    pub fn raw(&self) -> u64 {
        u64::from(self.allocated) | (u64::from(self.zero) << 32)
    }
}

/// What one subcluster of an extended L2 entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subcluster {
    /// Reads come from the backing file, or are zeros.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data at this host offset.
    Data { host_offset: u64 },
    /// Part of a compressed cluster (compressed clusters are not split).
    Compressed(CompressedCluster),
}

/// An extended L2 entry: a standard entry whose zero flag is unused, and
/// the subcluster bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtendedL2Entry {
    pub entry: L2Entry,
    pub bitmap: SubclusterBitmap,
}

impl ExtendedL2Entry {
    /// Decodes the two words of an extended L2 entry. The bitmap must
    /// agree with the entry: none for a compressed cluster, no allocated
    /// subclusters in an unallocated one, no subcluster both allocated
    /// and zero in an allocated one.
    pub fn decode(
        raw_entry: u64,
        raw_bitmap: u64,
        geometry: &Geometry,
    ) -> Result<Self, FormatError> {
        let geometry = extended(geometry)?;
        let entry = L2Entry::decode(raw_entry, &geometry)?;
        let bitmap = SubclusterBitmap::from_raw(raw_bitmap);
        let valid = match entry {
            L2Entry::Compressed(_) => raw_bitmap == 0,
            L2Entry::Unallocated => bitmap.allocated == 0,
            L2Entry::Normal { .. } => bitmap.allocated & bitmap.zero == 0,
            // Not produced by decode in an extended image.
            L2Entry::Zero { .. } => false,
        };
        if !valid {
            return Err(FormatError::InvalidSubclusterBitmap {
                entry: raw_entry,
                bitmap: raw_bitmap,
            });
        }
        Ok(ExtendedL2Entry { entry, bitmap })
    }

    /// The two words for this entry, refused where [`decode`] would
    /// refuse them.
    ///
    /// [`decode`]: ExtendedL2Entry::decode
    pub fn encode(&self, geometry: &Geometry) -> Result<(u64, u64), FormatError> {
        let geometry = extended(geometry)?;
        let raw_entry = self.entry.encode(&geometry)?;
        let raw_bitmap = self.bitmap.raw();
        // Round-trip through decode so both directions apply one rule.
        ExtendedL2Entry::decode(raw_entry, raw_bitmap, &geometry)?;
        Ok((raw_entry, raw_bitmap))
    }

    /// What subcluster `index` (0 to 31) holds.
    pub fn subcluster(&self, index: u32, geometry: &Geometry) -> Result<Subcluster, FormatError> {
        if index >= SUBCLUSTERS_PER_CLUSTER {
            return Err(FormatError::SubclusterIndex(index));
        }
        let bit = 1u32 << index;
        Ok(match self.entry {
            L2Entry::Compressed(c) => Subcluster::Compressed(c),
            _ if self.bitmap.zero & bit != 0 => Subcluster::Zero,
            L2Entry::Normal { host_offset, .. } if self.bitmap.allocated & bit != 0 => {
                let step = geometry.cluster_size() / u64::from(SUBCLUSTERS_PER_CLUSTER);
                Subcluster::Data {
                    // Saturating: an entry built by hand may hold any offset.
                    host_offset: host_offset.saturating_add(u64::from(index) * step),
                }
            }
            _ => Subcluster::Unallocated,
        })
    }
}

/// The same geometry with extended L2 entries, which the extended entry
/// functions assume whatever they are given.
fn extended(geometry: &Geometry) -> Result<Geometry, FormatError> {
    Geometry::new(
        geometry.cluster_bits(),
        geometry.refcount_order(),
        true,
        geometry.external_data_file(),
    )
}
