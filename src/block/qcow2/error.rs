//! The one error type of the qcow2 format code.
//!
//! Where QEMU refuses the same thing when it opens an image, the message is
//! the one QEMU prints, so that a user sees the same words from vubd and
//! from QEMU. Everything else (entries, refcounts, compressed data, the
//! encoders) has messages of its own.

use std::fmt;

/// A metadata table whose position and size the header gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// The active L1 table (`l1_table_offset`, `l1_size`).
    ActiveL1,
    /// The refcount table (`refcount_table_offset`,
    /// `refcount_table_clusters`).
    Refcount,
    /// The snapshot table (`snapshots_offset`, `nb_snapshots`).
    Snapshot,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::ActiveL1 => "Active L1 table",
            Table::Refcount => "Reference count table",
            Table::Snapshot => "Snapshot table",
        })
    }
}

/// Why some qcow2 metadata could not be parsed or encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    // ---- the header, in the order QEMU checks it ----
    /// The first four bytes are not `QFI\xfb`.
    #[error("Image is not in qcow2 format")]
    NotQcow2,
    /// Only versions 2 and 3 exist.
    #[error("Unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// `cluster_bits` outside 9..=21 (512 bytes to 2 MiB).
    #[error("Unsupported cluster size: 2^{0}")]
    UnsupportedClusterSize(u32),
    /// A version 3 `header_length` below 104.
    #[error("qcow2 header too short")]
    HeaderTooShort,
    /// `header_length` larger than a cluster.
    #[error("qcow2 header exceeds cluster size")]
    HeaderExceedsCluster,
    /// The backing file name would start outside the first cluster (or,
    /// vubd only, inside the header fields).
    #[error("Invalid backing file offset")]
    InvalidBackingFileOffset,
    /// `compression_type` names no known method.
    #[error("qcow2: unknown compression type: {0}")]
    UnknownCompressionType(u8),
    /// zlib compression with the compression type feature bit set.
    #[error("qcow2: Compression type incompatible feature bit must not be set")]
    CompressionBitSet,
    /// Another compression type without the feature bit.
    #[error("qcow2: Compression type incompatible feature bit must be set")]
    CompressionBitClear,
    /// Incompatible feature bits this code does not know; the text lists
    /// them by the image's feature name table where it names them.
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnsupportedFeatures(String),
    /// Extended L2 entries with clusters below 16 KiB, whose 32
    /// subclusters would be smaller than 512 bytes.
    #[error("Unsupported subcluster size: {0}")]
    UnsupportedSubclusterSize(u64),
    /// `refcount_order` above 6.
    #[error("Reference count entry width too large; may not exceed 64 bits")]
    RefcountOrderTooLarge,
    /// `crypt_method` other than none, AES or LUKS.
    #[error("Unsupported encryption method {0}")]
    UnsupportedEncryption(u32),
    /// `refcount_table_clusters` is 0.
    #[error("Image does not contain a reference count table")]
    NoRefcountTable,
    /// A table larger than QEMU accepts (32 MiB of L1 table, 8 MiB of
    /// refcount table, 65536 snapshots).
    #[error("{0} too large")]
    TableTooLarge(Table),
    /// A table that does not start on a cluster boundary, or ends past
    /// the largest file offset.
    #[error("{0} offset invalid")]
    TableOffsetInvalid(Table),
    /// A virtual size that no L1 table QEMU accepts can map.
    #[error("Image is too big")]
    ImageTooBig,
    /// `l1_size` smaller than the virtual size needs.
    #[error("L1 table is too small")]
    L1TableTooSmall,
    /// A header extension that runs past the end of the extension area.
    #[error("Header extension too large")]
    ExtensionTooLarge,
    /// A backing format name of 16 bytes or more.
    #[error("ERROR: ext_backing_format: len={0} too large (>=16)")]
    BackingFormatTooLong(u32),
    /// A full disk encryption extension in an image that is not LUKS.
    #[error("CRYPTO header extension only expected with LUKS encryption method")]
    UnexpectedCryptoHeader,
    /// A full disk encryption extension whose length is not 16.
    #[error("CRYPTO header extension size {0}, but expected size 16")]
    CryptoHeaderSize(u32),
    /// A LUKS header that does not start on a cluster boundary.
    #[error(
        "Encryption header offset '{offset}' is not a multiple of cluster size '{cluster_size}'"
    )]
    CryptoHeaderOffset { offset: u64, cluster_size: u64 },
    /// A bitmaps extension whose length is not 24.
    #[error("bitmaps_ext: Invalid extension length")]
    BitmapsExtensionLength,
    /// A bitmaps extension whose reserved word is not zero.
    #[error("bitmaps_ext: Reserved field is not zero")]
    BitmapsReserved,
    /// More than 65535 bitmaps.
    #[error("bitmaps_ext: Image has {0} bitmaps, exceeding the QEMU supported maximum of 65535")]
    TooManyBitmaps(u32),
    /// A bitmaps extension that lists no bitmap.
    #[error("found bitmaps extension with zero bitmaps")]
    NoBitmaps,
    /// A bitmap directory that does not start on a cluster boundary.
    #[error("bitmaps_ext: invalid bitmap directory offset")]
    BitmapDirectoryOffset,
    /// A bitmap directory larger than QEMU accepts.
    #[error(
        "bitmaps_ext: bitmap directory size ({0}) exceeds the maximum supported size (67107840)"
    )]
    BitmapDirectoryTooLarge(u64),
    /// The raw external data autoclear bit without an external data file.
    #[error("data-file-raw requires a data file")]
    DataFileRawWithoutDataFile,
    /// LUKS encryption without its header extension.
    #[error("Missing CRYPTO header for crypt method {0}")]
    MissingCryptoHeader(u32),
    /// A backing file name longer than 1023 bytes or than the rest of the
    /// first cluster.
    #[error("Backing file name too long")]
    BackingFileNameTooLong,

    // ---- buffers ----
    /// The buffer given ends before the structure does; parsing again
    /// with at least `needed` bytes gets further.
    #[error("{what} is truncated: {needed} bytes needed, {available} given")]
    Truncated {
        what: &'static str,
        needed: usize,
        available: usize,
    },
    /// The header, its extensions and the backing file name need more
    /// room than the first cluster (or the buffer) has.
    #[error("qcow2 header needs {needed} bytes, but only {available} are available")]
    HeaderDoesNotFit { needed: usize, available: usize },
    /// Header fields that contradict each other, so the header cannot be
    /// written as it is.
    #[error("Cannot encode the qcow2 header: {0}")]
    InconsistentHeader(&'static str),

    // ---- L1, L2 and refcount table entries ----
    /// An L1 entry with bits 0-8 or 56-62 set.
    #[error("L1 entry {0:#x} has reserved bits set")]
    L1ReservedBits(u64),
    /// An L1 or refcount table entry whose table offset is not cluster
    /// aligned.
    #[error("Table offset {0:#x} unaligned")]
    TableEntryUnaligned(u64),
    /// A refcount table entry with bits 0-8 set.
    #[error("Refcount table entry {0:#x} has reserved bits set")]
    RefcountTableReservedBits(u64),
    /// An L2 entry with reserved bits set (bits 1-8 or 56-61 of a standard
    /// entry, bit 0 of an extended one, offset bits above 55 of a
    /// compressed one).
    #[error("L2 entry {0:#x} has reserved bits set")]
    L2ReservedBits(u64),
    /// A data cluster offset that is not cluster aligned.
    #[error("Cluster allocation offset {0:#x} unaligned")]
    ClusterOffsetUnaligned(u64),
    /// A compressed cluster entry with the COPIED flag, which such
    /// entries never have.
    #[error("Compressed cluster entry {0:#x} has the COPIED flag set")]
    CompressedCopied(u64),
    /// An entry with offset 0 and the COPIED flag in an image without an
    /// external data file.
    #[error("Cluster entry {0:#x} has the COPIED flag but no offset")]
    CopiedWithoutOffset(u64),
    /// An extended L2 entry whose subcluster bitmap contradicts the
    /// entry.
    #[error("Invalid cluster entry found (L2 entry {entry:#x}, subcluster bitmap {bitmap:#x})")]
    InvalidSubclusterBitmap { entry: u64, bitmap: u64 },
    /// A host offset the entry has no room for.
    #[error("Host offset {0:#x} cannot be stored in this entry")]
    OffsetOutOfRange(u64),
    /// A compressed cluster spanning more sectors than the entry counts.
    #[error(
        "Compressed data of {sectors} sectors cannot be described with {cluster_bits}-bit clusters"
    )]
    CompressedTooLong { sectors: u64, cluster_bits: u32 },
    /// A subcluster index of 32 or more.
    #[error("Subcluster index {0} out of range")]
    SubclusterIndex(u32),
    /// A refcount index beyond the refcount block.
    #[error("Refcount index {index} is outside a block of {entries} entries")]
    RefcountIndex { index: u64, entries: u64 },
    /// A refcount value wider than the refcount entries.
    #[error("Refcount {value} does not fit in {bits} bits")]
    RefcountValue { value: u64, bits: u32 },

    // ---- snapshots ----
    /// More than 1024 bytes of extra data in one snapshot table entry.
    #[error("Too much extra metadata in snapshot table entry {0}")]
    SnapshotExtraTooLarge(u32),
    /// A snapshot table longer than 64 MiB.
    #[error("Snapshot table is too big")]
    SnapshotTableTooBig,
    /// A snapshot that cannot be written as it is.
    #[error("Cannot encode snapshot table entry {index}: {reason}")]
    InconsistentSnapshot { index: usize, reason: &'static str },

    // ---- compressed clusters ----
    /// The compressed data is not a valid deflate or zstd stream.
    #[error("Compressed cluster is corrupt: {0}")]
    CompressedCorrupt(String),
    /// The compressed data decompresses to less than a cluster.
    #[error("Compressed cluster decompresses to {got} bytes instead of {expected}")]
    DecompressedShort { got: usize, expected: usize },
    /// The zstd frame goes on past one cluster of data.
    #[error("Compressed cluster decompresses to more than {0} bytes")]
    DecompressedLong(usize),
}
