//! The qcow2 on-disk format, as the driver uses it:
//!
//! * [`Header::parse`] checks and reads the first cluster, including the
//!   extensions and the backing file name; [`Header::encode`] writes it
//!   back; [`Header::geometry`] gives the sizes and index arithmetic.
//! * [`L1Entry`], [`L2Entry`] and [`ExtendedL2Entry`] decode and encode
//!   table entries; [`decode_refcount_table_entry`] and
//!   [`encode_refcount_table_entry`] the refcount table's.
//! * [`get_refcount`] and [`set_refcount`] work on a refcount block.
//! * [`parse_snapshot_table`] and [`encode_snapshot_table`].
//! * [`decompress`] turns a compressed cluster's bytes into the cluster.
//!
//! Every function takes bytes or integers and returns a
//! [`FormatError`] for input it cannot accept; none panics on input.

pub use super::compress::decompress;
pub use super::entries::{
    decode_refcount_table_entry, encode_refcount_table_entry, CompressedCluster, ExtendedL2Entry,
    L1Entry, L2Entry, Subcluster, SubclusterBitmap, COMPRESSED, COPIED, OFFSET_MASK,
    REFTABLE_OFFSET_MASK, ZERO,
};
pub use super::error::{FormatError, Table};
pub use super::extensions::{
    BitmapsExtension, EncryptionHeader, ExtensionKind, HeaderExtension, EXT_BACKING_FORMAT,
    EXT_BITMAPS, EXT_END, EXT_EXTERNAL_DATA_FILE, EXT_FEATURE_NAME_TABLE, EXT_FULL_DISK_ENCRYPTION,
};
pub use super::features::{autoclear, compatible, incompatible, FeatureKind, FeatureName};
pub use super::header::{
    CompressionType, CryptMethod, Header, MAGIC, MAX_BACKING_FILE_NAME, V2_HEADER_LENGTH,
    V3_MIN_HEADER_LENGTH,
};
pub use super::layout::{
    Geometry, GuestPosition, RefcountPosition, COMPRESSED_SECTOR_SIZE, MAX_CLUSTER_BITS,
    MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, SUBCLUSTERS_PER_CLUSTER,
};
pub use super::refcount::{get_refcount, set_refcount};
pub use super::snapshot::{
    encode_snapshot_table, parse_snapshot_table, snapshot_table_len, Snapshot, MAX_EXTRA_DATA,
    MAX_TABLE_LEN,
};
