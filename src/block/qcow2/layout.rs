//! The arithmetic of an image's geometry: table sizes and where a guest
//! or host offset falls in the two-level tables.

use super::error::FormatError;

/// Smallest and largest cluster sizes QEMU opens (512 bytes, 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Refcount entries are 1 to 64 bits wide.
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Images with extended L2 entries split each cluster into this many
/// subclusters.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// Compressed data is counted in sectors of this size.
pub const COMPRESSED_SECTOR_SIZE: u64 = 512;

/// The sizes that follow from `cluster_bits`, `refcount_order` and the
/// feature bits that change entry formats. Every value is checked when it
/// is built, so its methods cannot fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    refcount_order: u32,
    extended_l2: bool,
    external_data_file: bool,
}

/// Where a guest offset is mapped: which L1 entry, which entry of that
/// L2 table, and how far into the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPosition {
    pub l1_index: u64,
    pub l2_index: u64,
    pub offset_in_cluster: u64,
}

/// Where the refcount of a host cluster is kept: which refcount table
/// entry, and which entry of that refcount block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountPosition {
    pub table_index: u64,
    pub block_index: u64,
}

impl Geometry {
    /// Checks the values as QEMU does when it opens an image.
    pub fn new(
        cluster_bits: u32,
        refcount_order: u32,
        extended_l2: bool,
        external_data_file: bool,
    ) -> Result<Self, FormatError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::UnsupportedClusterSize(cluster_bits));
        }
        if extended_l2 && cluster_bits - 5 < MIN_CLUSTER_BITS {
            return Err(FormatError::UnsupportedSubclusterSize(
                (1u64 << cluster_bits) / u64::from(SUBCLUSTERS_PER_CLUSTER),
            ));
        }
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(FormatError::RefcountOrderTooLarge);
        }
        Ok(Geometry {
            cluster_bits,
            refcount_order,
            extended_l2,
            external_data_file,
        })
    }

    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_order(&self) -> u32 {
        self.refcount_order
    }

    /// Width of a refcount entry in bits (1 to 64).
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The largest refcount an entry can hold.
    pub fn max_refcount(&self) -> u64 {
        u64::MAX >> (64 - self.refcount_bits())
    }

    pub fn extended_l2(&self) -> bool {
        self.extended_l2
    }

    pub fn external_data_file(&self) -> bool {
        self.external_data_file
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// log2 of the number of entries in an L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// Entries in one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }

    /// Entries in one refcount block (one cluster).
    pub fn refcount_block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    /// Subclusters per cluster: 32 with extended L2 entries, otherwise 1.
    pub fn subclusters_per_cluster(&self) -> u32 {
        if self.extended_l2 {
            SUBCLUSTERS_PER_CLUSTER
        } else {
            1
        }
    }

    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters_per_cluster())
    }

    /// `offset` modulo the cluster size.
    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// Which L1 entry, L2 entry and byte of the cluster a guest offset
    /// falls on.
    pub fn guest_position(&self, guest_offset: u64) -> GuestPosition {
        let cluster = guest_offset >> self.cluster_bits;
        GuestPosition {
            l1_index: cluster >> self.l2_bits(),
            l2_index: cluster & (self.l2_entries() - 1),
            offset_in_cluster: self.offset_in_cluster(guest_offset),
        }
    }

    /// The subcluster that a byte offset within a cluster falls in (always
    /// 0 without extended L2 entries).
    pub fn subcluster_index(&self, offset_in_cluster: u64) -> u32 {
        let index = self.offset_in_cluster(offset_in_cluster) / self.subcluster_size();
        // Below 32 by construction: the offset is less than a cluster.
        u32::try_from(index).unwrap_or(0)
    }

    /// Which refcount table entry and refcount block entry count the
    /// cluster at `host_offset`.
    pub fn refcount_position(&self, host_offset: u64) -> RefcountPosition {
        let cluster = host_offset >> self.cluster_bits;
        let per_block_bits = self.cluster_bits + 3 - self.refcount_order;
        RefcountPosition {
            table_index: cluster >> per_block_bits,
            block_index: cluster & ((1 << per_block_bits) - 1),
        }
    }

    /// How many L1 entries a virtual disk of `size` bytes needs.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(1 << (self.cluster_bits + self.l2_bits()))
    }

    /// Bit position where a compressed cluster descriptor's sector count
    /// starts: `62 - (cluster_bits - 8)`.
    pub fn compressed_offset_bits(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}
